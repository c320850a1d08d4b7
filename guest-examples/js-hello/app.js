// js-hello: a wasmform web process in JavaScript, built with componentize-js (StarlingMonkey).
//
// StarlingMonkey's event loop cannot be entered twice, so an instance answers one request: the
// type runs with `max_requests = 1` (a fresh instance per request). `count` shows it: every
// answer says `request 1`.
let count = 0;

addEventListener("fetch", (event) => {
  count += 1;
  const url = new URL(event.request.url);
  event.respondWith(
    new Response(`hello from js, request ${count}, path ${url.pathname}\n`, {
      headers: { "content-type": "text/plain; charset=utf-8" },
    }),
  );
});
