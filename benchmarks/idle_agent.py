"""The smallest instance agent: answers /health as healthy and exits on SIGTERM.

Standard library only, so 200 of them start in seconds and fit in memory for the reaper benchmark.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys

HEALTH = json.dumps(
    {
        # Every field of instance_agent.protocol.HealthReady: the control plane checks them.
        "status": "healthy",
        "model": "idle",
        "model_loaded": True,
        "note": "Model is loaded in memory for fast inference",
        "task": "text-generation",
        "concurrency": 1,
        "maxQueue": 0,
        "inFlight": 0,
        "queued": 0,
        "loadSeconds": 0.0,
        "device": "cpu",
        "contextLength": 256,
        "memory": {"rssBytes": 1, "peakRssBytes": 1, "gpuBytes": None, "peakGpuBytes": None},
        "stats": {"batches": 0, "maxBatchSize": 1, "requests": 0},
    }
).encode()


async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if length:
                await reader.readexactly(length)
            ok = head.startswith(b"GET /health ")
            body = HEALTH if ok else b'{"error":"not found","code":"not_found"}'
            status = b"200 OK" if ok else b"404 Not Found"
            writer.write(
                b"HTTP/1.1 "
                + status
                + b"\r\nContent-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


async def serve(port: int) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    server = await asyncio.start_server(handle, "127.0.0.1", port)
    async with server:
        await stop.wait()


def main() -> None:
    args = sys.argv[1:]
    asyncio.run(serve(int(args[args.index("--port") + 1])))


if __name__ == "__main__":
    main()
