"""python-hello: a web process written in Python, built with componentize-py.

It is the "large component" of wasmform's benchmark (~18 MB: CPython and its standard
library compiled to WebAssembly). Build it from the repository root with:

    componentize-py -d wit -w wasi:http/proxy@0.2.12 componentize -p guest-examples/python-hello app -o python-hello.wasm

Every request answers `hello from python, request {n}`; `n` counts this instance's requests,
which shows that the instance (and its Python interpreter) lives between requests.
"""

from wit_world import exports
from wit_world.imports.types import (
    Fields, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
)
from componentize_py_types import Ok

count = 0

class IncomingHandler(exports.IncomingHandler):
    def handle(self, request: IncomingRequest, response_out: ResponseOutparam) -> None:
        global count
        count += 1
        response = OutgoingResponse(Fields.from_list([("content-type", b"text/plain")]))
        body = response.body()
        ResponseOutparam.set(response_out, Ok(response))
        with body.write() as stream:
            stream.blocking_write_and_flush(f"hello from python, request {count}\n".encode())
        OutgoingBody.finish(body, None)
