"""The engine in a process of its own, so that the HTTP server's event loop and the engine's worker never share a GIL.

In one process the event loop (HTTP parsing, SSE formatting, a socket write per streamed token) and the engine's
worker thread (planning, launching and reading steps) take turns on one GIL, and each socket write or CUDA call
hands it over: at 64 streams on an H200 the server streamed 0.73× what the engine made alone
(bench/results/gpu-2026-12-02-piecewise). With `engine_process` on, the engine runs in a child process (spawned:
CUDA is never forked) and the server talks to it over three pipes:

    commands  server → engine   submit, cancel, stop accepting, abort all, stop, and the small jobs
                                (detach an adapter, warm up, the numbers for /metrics): in one order
    weights   server → engine   attach an adapter: where its checked files are and their sha256 (the engine
                                process reads them itself, and refuses them if they changed since)
    events    engine → server   one message per engine iteration: the requests' events, finished jobs

`client.EngineProcess` is the server's side: the Engine surface that the service, the adapter registry and the
server's state use. `child.main` is the child's. Neither knows HTTP. `launch` starts the child; `loraserve serve`
calls it before the server's own imports, so that the child loads the model meanwhile (it imports no torch).
"""
