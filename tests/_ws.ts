// The ws package (npm), the tests' independent WebSocket peer. Test-only
// npm packages are imported by inline specifier, never through deno.json's
// import map, so that the examples start on a machine without npm access.
export { default as NodeWebSocket, WebSocketServer } from "npm:ws@8";
