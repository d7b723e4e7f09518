#!/usr/bin/env python3
"""A local SMTP sink for the e-mail tests: accepts every message and writes it, as received,
to DIR/NNNN.eml (written to a temporary name first, then renamed, so a reader never sees half a
message).

    python3 tests/smtp_sink.py --dir DIR [--host 127.0.0.1] [--port 0]

Prints exactly one line, "LISTENING <port>", once it accepts connections. Exits when its
standard input closes, so a test that dies leaves no server behind. Needs aiosmtpd
(scripts/setup installs it).
"""

import argparse
import asyncio
import os
import sys

from aiosmtpd.smtp import SMTP


class Sink:
    def __init__(self, directory):
        self.directory = directory
        self.count = 0

    async def handle_DATA(self, server, session, envelope):
        self.count += 1
        name = f"{self.count:04d}.eml"
        tmp = os.path.join(self.directory, f".{name}.tmp")
        with open(tmp, "wb") as f:
            content = envelope.original_content or envelope.content
            if isinstance(content, str):
                content = content.encode("utf-8")
            f.write(content)
        os.replace(tmp, os.path.join(self.directory, name))
        return "250 Message accepted for delivery"


async def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dir", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.dir, exist_ok=True)
    sink = Sink(args.dir)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(sink, hostname="smtp-sink.test"), args.host, args.port
    )
    port = server.sockets[0].getsockname()[1]
    print(f"LISTENING {port}", flush=True)
    # Blocks in a thread until the parent closes our stdin.
    await loop.run_in_executor(None, sys.stdin.read)
    server.close()


if __name__ == "__main__":
    asyncio.run(main())
