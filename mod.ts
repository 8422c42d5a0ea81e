/**
 * A WebSocket (RFC 6455) library for Deno with zero dependencies: a port of
 * Go's gorilla/websocket, made idiomatic TypeScript.
 *
 * - {@linkcode Upgrader} upgrades an HTTP request on the server side and
 *   {@linkcode serve} is the HTTP/1.1 server that can hand its connection over.
 * - {@linkcode Dialer} opens client connections (`ws://`, `wss://`, proxies).
 * - {@linkcode Conn} reads and writes messages, streams, control frames.
 * - permessage-deflate (RFC 7692) is negotiated with `enableCompression`.
 * - {@linkcode WebSocket} and {@linkcode upgradeWebSocket} have the WHATWG shape.
 * - {@linkcode WebSocketStream} gives a connection WHATWG streams, on both sides.
 * - {@linkcode joinMessages} reads a connection's messages as one byte stream.
 * - {@linkcode Topics} publishes to subscribed connections, across
 *   processes through a {@linkcode Broker} (Redis: `@denows/websocket/redis`).
 *
 * @module
 */
export * from "./frame.ts";
export * from "./conn.ts";
export * from "./upgrader.ts";
export * from "./dialer.ts";
export * from "./deflate.ts";
export * from "./topics.ts";
export * from "./join.ts";
export * from "./stream.ts";
export * from "./websocket.ts";
