// The package is ready for JSR: every public symbol is documented
// (`deno doc --lint`) and `deno publish --dry-run` accepts it, with no slow
// types. Both run on the checkout as a user of the tools would.

import assert from "node:assert/strict";

const root = new URL("..", import.meta.url).pathname;

async function deno(...args: string[]) {
  const { code, stdout, stderr } = await new Deno.Command(Deno.execPath(), {
    args,
    cwd: root,
    env: { NO_COLOR: "1" },
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decode = (bytes: Uint8Array) => new TextDecoder().decode(bytes);
  return { code, output: decode(stdout) + decode(stderr) };
}

Deno.test("deno doc --lint mod.ts finds nothing undocumented", async () => {
  const { code, output } = await deno("doc", "--lint", "mod.ts");
  assert.equal(code, 0, output);
  assert.doesNotMatch(output, /error/i);
});

Deno.test("deno publish --dry-run accepts the package with no slow types", async () => {
  // --allow-dirty: the check is about the files, not the git state.
  const { code, output } = await deno("publish", "--dry-run", "--allow-dirty");
  // A slow type in the public API fails the dry run.
  assert.equal(code, 0, output);
  assert.match(output, /Dry run complete/);
  // Only the library is published: no tests, examples or benchmarks.
  assert.doesNotMatch(output, /\/(tests|examples|bench)\//);
});
