// Builds a JavaScript web guest into a WASI 0.2 component with componentize-js.
//
//     node build.mjs app.js out.wasm        (after `npm ci` in this directory)
//
// StarlingMonkey (inside componentize-js 0.23) is built against WASI 0.2.10 and exports
// `wasi:http/incoming-handler@0.2.10`, so the world must name that version. Rather than keep a
// second copy of the WASI interfaces, this writes the repository's `wit/deps` (WASI 0.2.12) to
// a temporary directory at 0.2.10, leaving out the one item gated on 0.2.12; wasmtime links
// the component's imports semver-compatibly.
//
// package.json lists `@bytecodealliance/preview2-shim` next to componentize-js because
// componentize-js 0.23 imports it at run time (lib/spidermonkey-embedding-splicer.js) but
// declares it only as a devDependency: without it, `npm ci` on a fresh machine installs a
// componentize-js that fails with ERR_MODULE_NOT_FOUND.
import { componentize } from "@bytecodealliance/componentize-js";
import { mkdtemp, mkdir, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { basename, dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const [source, out] = process.argv.slice(2);
if (!source || !out) {
  console.error("usage: node build.mjs <app.js> <out.wasm>");
  process.exit(2);
}
const here = dirname(fileURLToPath(import.meta.url));
const deps = join(here, "../../wit/deps");
const wit = await mkdtemp(join(tmpdir(), "wasmform-js-wit-"));
try {
  await mkdir(join(wit, "deps"));
  for (const file of await readdir(deps)) {
    if (!file.endsWith(".wit")) continue;
    const text = (await readFile(join(deps, file), "utf8"))
      .replace(/@since\(version = 0\.2\.12\)\s*\n\s*[^\n]*\n/g, "")
      .replaceAll("@0.2.12", "@0.2.10");
    await writeFile(join(wit, "deps", basename(file)), text);
  }
  await writeFile(
    join(wit, "world.wit"),
    "package wasmform:js-guest;\n\nworld web {\n  export wasi:http/incoming-handler@0.2.10;\n}\n",
  );
  const { component } = await componentize({
    sourcePath: resolve(source),
    witPath: wit,
    worldName: "web",
  });
  await writeFile(out, component);
} finally {
  await rm(wit, { recursive: true, force: true });
}
