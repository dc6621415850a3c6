"""Server CPU time per request under uvicorn: the bare app against keystile (cached
``prod_`` key, memory store), with Starlette's AuthenticationMiddleware and a dict (the
do-it-yourself baseline) for reference.

Starts one uvicorn process (one worker, no access log) per app on a free loopback port,
then loads each from a separate client process: a small asyncio HTTP/1.1 keep-alive
client sending a fixed number of the same request (with an ``Authorization: Bearer``
header of the same length to every app, the bare one included) over N connections. The
figure is the server's CPU time (utime + stime from ``/proc/<pid>/stat``, read just
before and after each batch) divided by the requests of the batch. A round is one batch
per server; the order rotates from round to round, and runs backwards every other cycle of
rotations, so that no server always goes first and each pair of servers runs in either
order equally often (keystile sits between its two references, usage off and
AuthenticationMiddleware, in the cycle). The table gives each server's median over rounds;
the targets are paired: within each round the ratio of keystile's batch to the other's,
and the figure is the median of those per-round ratios (quartiles beside it, the ratio of
the medians for reference): the machine's speed drifts by tens of percent from second to
second, and two batches of one round meet more of the same drift than two medians over
all rounds do. What is measured is what it was before the pairing (the same batches of the
same requests against the same apps); only the order and the figures computed from the
samples changed. Linux only (it reads /proc).

    python benchmarks/bench_server.py              # about a minute
    python benchmarks/bench_server.py --quick      # a few seconds
    python benchmarks/bench_server.py --requests 30000 --connections 16 --rounds 5

uvicorn picks httptools and uvloop when they are installed (``--http auto``, ``--loop
auto``), h11 and asyncio otherwise; the run prints which.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from apps import KEYS_ENV, NAMESPACE_ENV, PATH, REDIS_ENV, TOKEN_FILE_ENV, USAGE_ENV
from pairing import order, paired

HERE = Path(__file__).resolve().parent
TOKENS_ENV = "KSBENCH_TOKENS"  # the client's: the file of the keys to send, one per line
TICKS = os.sysconf("SC_CLK_TCK")

# -- the load client (runs in its own process) --------------------------------------------------


async def load(port: int, tokens: list[str], requests: int, connections: int) -> dict[str, object]:
    """Send ``requests`` GETs over ``connections`` keep-alive connections, the keys taken
    round-robin; count statuses and time each answer."""
    requests_by_key = [
        (
            f"GET {PATH} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: ksbench/1\r\n"
            f"Accept: */*\r\nAuthorization: Bearer {token}\r\n\r\n"
        ).encode()
        for token in tokens
    ]
    sent = 0
    statuses: Counter[int] = Counter()
    latencies: list[float] = []
    clock = time.perf_counter

    async def worker() -> None:
        nonlocal sent
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while sent < requests:
                request = requests_by_key[sent % len(requests_by_key)]
                sent += 1
                began = clock()
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                status = int(head[9:12])
                length = None
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                if length is None:
                    raise RuntimeError("a response without content-length")
                await reader.readexactly(length)
                latencies.append(clock() - began)
                statuses[status] += 1
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    latencies.sort()
    return {
        "seconds": time.perf_counter() - began,
        "statuses": {str(k): v for k, v in statuses.items()},
        "p50": latencies[len(latencies) // 2],
        "p99": latencies[min(len(latencies) - 1, len(latencies) * 99 // 100)],
    }


def client_main(args: argparse.Namespace) -> int:
    tokens = Path(os.environ[TOKENS_ENV]).read_text(encoding="ascii").split()
    result = asyncio.run(
        asyncio.wait_for(load(args.port, tokens, args.requests, args.connections), args.timeout)
    )
    print(json.dumps(result))
    return 0


# -- the servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, in seconds (clock-tick resolution)."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        text = stat.read()
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and parens
    return (int(fields[11]) + int(fields[12])) / TICKS  # fields 14 and 15 of proc(5)


@dataclass
class Server:
    label: str
    target: str  # apps:name
    factory: bool
    env: dict[str, str] = field(default_factory=dict)  # the app's own variables
    token_file: Path | None = None  # where the app writes its keys; None: no key
    port: int = 0
    tokens: Path | None = None  # the keys the client sends (another app's, for the bare one)
    process: subprocess.Popen[bytes] | None = None
    log: Path | None = None
    samples: list[float] = field(default_factory=list)  # server CPU µs per request
    rates: list[float] = field(default_factory=list)  # requests per second (wall)
    p50: list[float] = field(default_factory=list)  # per batch, seconds
    p99: list[float] = field(default_factory=list)

    def start(self, workdir: Path, args: argparse.Namespace) -> None:
        self.port = free_port()
        name = "".join(c if c.isalnum() else "-" for c in self.label)  # unique per server
        self.log = workdir / f"{name}.log"
        env = dict(os.environ)
        env.pop("KEYSTILE_REDIS_URL", None)
        env.update(self.env, **{KEYS_ENV: str(args.keys)})
        if self.factory:
            self.token_file = workdir / f"{name}.token"
            env[TOKEN_FILE_ENV] = str(self.token_file)
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(HERE),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--no-access-log",
            "--log-level",
            "warning",
            "--http",
            args.http,
            "--loop",
            args.loop,
            "--lifespan",
            "on",
            *(["--factory"] if self.factory else []),
            self.target,
        ]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir
            )

    def wait_ready(self, deadline: float) -> None:
        assert self.process is not None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label}: uvicorn exited\n{self.tail()}")
            if self.token_file is None or self.token_file.exists():
                with (
                    contextlib.suppress(OSError),
                    socket.create_connection(("127.0.0.1", self.port), timeout=0.5),
                ):
                    if self.token_file is not None:
                        self.tokens = self.token_file
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.label}: not serving on port {self.port} in time\n{self.tail()}")

    def tail(self) -> str:
        if self.log is None or not self.log.exists():
            return ""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)


def run_client(server: Server, requests: int, args: argparse.Namespace) -> float:
    """One batch against ``server``; its CPU µs per request. Checks every answer was 200."""
    assert server.process is not None and server.tokens is not None
    env = dict(os.environ, **{TOKENS_ENV: str(server.tokens)})
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        "--port",
        str(server.port),
        "--requests",
        str(requests),
        "--connections",
        str(args.connections),
        "--timeout",
        str(args.timeout),
    ]
    before = cpu_seconds(server.process.pid)
    done = subprocess.run(
        command, capture_output=True, env=env, timeout=args.timeout + 10, check=False
    )
    after = cpu_seconds(server.process.pid)
    if done.returncode != 0:
        raise RuntimeError(f"the load client failed:\n{done.stderr.decode(errors='replace')}")
    result = json.loads(done.stdout)
    if result["statuses"] != {"200": requests}:
        raise RuntimeError(f"{server.label}: expected {requests} x 200, got {result['statuses']}")
    server.rates.append(requests / result["seconds"])
    server.p50.append(result["p50"])
    server.p99.append(result["p99"])
    return (after - before) / requests * 1e6


def resolved(choice: str, fast: str, fallback: str) -> str:
    if choice != "auto":
        return choice
    return fast if importlib.util.find_spec(fast) is not None else fallback


def cleanup(url: str, namespace: str) -> None:
    """Delete what the run wrote under its own namespace; never flush the server."""
    import redis

    client = redis.Redis.from_url(url)
    try:
        names = list(client.scan_iter(match=f"{namespace}:*", count=1000))
        for start in range(0, len(names), 1000):
            client.unlink(*names[start : start + 1000])
    finally:
        client.close()


def contenders(args: argparse.Namespace, namespace: str) -> list[Server]:
    """The bare app, keystile (memory store, or Redis with ``--redis``), keystile with usage
    off (``--usage-off``) and AuthenticationMiddleware with a dict."""
    store = "memory store"
    keystile_env: dict[str, str] = {}
    if args.redis:
        store = "Redis store"
        keystile_env = {REDIS_ENV: args.redis, NAMESPACE_ENV: namespace}
    keys = "cached prod_ key" if args.keys == 1 else f"{args.keys:,} prod_ keys"
    servers = [
        Server("bare Starlette app", "apps:bare_app", factory=False),
        Server(f"keystile, {keys}, {store}", "apps:keystile_app", True, keystile_env),
    ]
    if args.usage_off:
        off = dict(keystile_env, **{USAGE_ENV: "off"})
        if args.redis:
            off[NAMESPACE_ENV] = namespace + "-off"
        servers.append(Server("keystile, the same, usage off", "apps:keystile_app", True, off))
    servers.append(Server("AuthenticationMiddleware + dict backend", "apps:authmw_app", True))
    return servers


def paired_text(numerator: Server, denominator: Server) -> tuple[float, str]:
    """The paired figure and how it reads: its quartiles and the ratio of the medians."""
    ratio, low, high = paired(numerator.samples, denominator.samples)
    by_medians = numerator.median / denominator.median
    rounds = len(numerator.samples)
    return ratio, (
        f"{ratio:.3f} (paired: median of {rounds} per-round ratios, quartiles {low:.3f} .. "
        f"{high:.3f}; ratio of the medians {by_medians:.3f})"
    )


def main(args: argparse.Namespace) -> int:
    requests, rounds = args.requests, args.rounds
    if args.quick:
        requests, rounds = min(requests, 3000), min(rounds, 2)
    namespace = f"ksbench-{os.getpid()}-{time.time_ns() % 10**9}"
    servers = contenders(args, namespace)
    bare, keystile, auth = servers[0], servers[1], servers[-1]
    off = servers[2] if args.usage_off else None
    # keystile next to each of the two it is judged against: usage off before it, the
    # AuthenticationMiddleware after it (the bare app closes the cycle)
    cycle = [s for s in (off, keystile, auth, bare) if s is not None]
    with tempfile.TemporaryDirectory(prefix="ksbench-") as tmp:
        workdir = Path(tmp)
        try:
            for server in servers:
                server.start(workdir, args)
            deadline = time.monotonic() + args.startup_timeout
            for server in servers:
                server.wait_ready(deadline)
            bare.tokens = keystile.tokens  # the same request bytes; the bare app ignores them

            for server in servers:  # warm-up: every key once (it fills keystile's cache)
                run_client(server, max(requests // 10, 200, args.keys), args)
                server.rates.clear()
                server.p50.clear()
                server.p99.clear()
            for number in range(rounds):
                for server in order(cycle, number):
                    server.samples.append(run_client(server, requests, args))
        finally:
            for server in servers:
                server.stop()
            if args.redis:
                cleanup(args.redis, namespace)
                cleanup(args.redis, namespace + "-off")

    http = resolved(args.http, "httptools", "h11")
    loop = resolved(args.loop, "uvloop", "asyncio")
    print(
        f"\nServer CPU per request under uvicorn (one worker, --http {http}, --loop {loop}): "
        f"{rounds} rounds x {requests} requests per app, {args.connections} keep-alive "
        f"connections from a separate process, {args.keys:,} key(s) round-robin; "
        f"Python {sys.version.split()[0]}"
    )
    width = max(len(s.label) for s in servers)
    texts = {s.label: " ".join(f"{x:.0f}" for x in s.samples) for s in servers}
    column = max(28, *(len(t) for t in texts.values()))
    header = (
        f"{'app':<{width}}  {'CPU µs/request':>14}  {'rounds (µs)':<{column}}  {'req/s':>6}  "
        f"{'x bare':>6}  {'p50 ms':>6}  {'p99 ms':>6}"
    )
    print(header)
    print("-" * len(header))
    for server in servers:
        print(
            f"{server.label:<{width}}  {server.median:>14.1f}  {texts[server.label]:<{column}}  "
            f"{statistics.median(server.rates):>6.0f}  {server.median / bare.median:>6.3f}  "
            f"{statistics.median(server.p50) * 1e3:>6.2f}  "
            f"{statistics.median(server.p99) * 1e3:>6.2f}"
        )
    print(
        f"\nFor reference, AuthenticationMiddleware + dict adds "
        f"{auth.median - bare.median:+.1f} µs/request (x{auth.median / bare.median:.3f})."
    )
    if args.keys == 1:
        ratio, text = paired_text(keystile, bare)
        print(
            f"Target: keystile / bare server CPU per request = {text} <= 1.10: "
            f"{'PASS' if ratio <= 1.10 else 'FAIL'}  "
            f"(added {keystile.median - bare.median:+.1f} µs/request by medians; one clock "
            f"tick of {1000 / TICKS:.0f} ms is {1e6 / TICKS / requests:.2f} µs/request at this "
            f"batch size)"
        )
        return 0
    cpu, text = paired_text(keystile, auth)
    p99 = statistics.median(keystile.p99) / statistics.median(auth.p99)
    print(
        f"Target: keystile / AuthenticationMiddleware server CPU per request = {text} "
        f"<= 1.3: {'PASS' if cpu <= 1.3 else 'FAIL'}"
    )
    print(
        f"Target: keystile / AuthenticationMiddleware p99 = {p99:.2f} <= 2: "
        f"{'PASS' if p99 <= 2 else 'FAIL'}"
    )
    if off is not None:
        usage, text = paired_text(keystile, off)
        print(
            f"Target: usage on / off server CPU per request = {text} <= 1.15: "
            f"{'PASS' if usage <= 1.15 else 'FAIL'}"
        )
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per batch (20000)")
    parser.add_argument("--rounds", type=int, default=5, help="batches per app (5)")
    parser.add_argument("--connections", type=int, default=8, help="keep-alive connections (8)")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 3000 requests")
    parser.add_argument("--timeout", type=float, default=120, help="seconds per batch (120)")
    parser.add_argument("--startup-timeout", type=float, default=20)
    parser.add_argument("--http", default="auto", choices=["auto", "h11", "httptools"])
    parser.add_argument("--loop", default="auto", choices=["auto", "asyncio", "uvloop"])
    parser.add_argument("--keys", type=int, default=1, help="keys called round-robin (1)")
    parser.add_argument("--redis", default="", help="keystile's store (default: memory)")
    parser.add_argument("--usage-off", action="store_true", help="keystile with usage off too")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.connections < 1 or args.keys < 1:
        parser.error("--requests, --rounds, --connections and --keys must be positive")
    return args


if __name__ == "__main__":
    arguments = parse_args()
    sys.exit(client_main(arguments) if arguments.client else main(arguments))
