"""CPU instructions per request, counted by valgrind: a cost figure a noisy machine cannot
move.

Time per request on a shared two-core VM drifts by a factor of three from one hour to the
next, and interference hits allocation-heavy code harder than the rest; instruction
counts do not drift (the same binary, input and environment give the same count, whatever
else the machine is doing). For each contender, this runs the same in-process raw-ASGI
requests as ``bench_middleware.py`` under ``valgrind --tool=callgrind`` twice — with 0
and with N requests after a warm-up of 200 — and divides the difference by N, so start-up,
imports and the warm-up cancel out.

    python benchmarks/instructions.py            # N = 1000, about 4 minutes
    python benchmarks/instructions.py --requests 3000

Needs valgrind (``apt-get install valgrind``). Each count runs with PYTHONHASHSEED=0.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONTENDERS = {
    "bare": "bare Starlette app",
    "authmw": "AuthenticationMiddleware + dict backend",
    "plain": "keystile, usage off, metrics off",
    "off": "keystile, cached prod_ key, memory store, usage off",
    "on": "keystile, cached prod_ key, memory store (the defaults)",
}
WARM_UP = 200


async def serve(contender: str, requests: int) -> None:
    """The requests one counted run makes (in the child process, under valgrind)."""
    from starlette.middleware import Middleware

    from apps import KEY_SETTINGS, SCOPES, SECRET, DictBackend, DictKey, make_app
    from bench_middleware import bearer, discard, fresh, http_scope
    from bench_middleware import receive as receive_one
    from keystile.gate import Keystile
    from keystile.middleware import KeystileMiddleware

    gate = Keystile(store="memory://", secret=SECRET)
    try:
        created = await gate.manager.create(KEY_SETTINGS)
        token = created.secret.get_secret_value()
        app: Any
        if contender == "bare":
            app = make_app()
        elif contender == "authmw":
            from starlette.middleware.authentication import AuthenticationMiddleware

            backend = DictBackend({token: DictKey("bench", SCOPES)})
            app = make_app([Middleware(AuthenticationMiddleware, backend=backend)])
        else:
            options = {"record_usage": contender == "on", "metrics": contender != "plain"}
            app = make_app([Middleware(KeystileMiddleware, gate=gate, **options)])
        template = http_scope(bearer(token))
        scopes = [fresh(template) for _ in range(WARM_UP + requests)]
        for scope in scopes:
            await app(scope, receive_one, discard)
    finally:
        await gate.aclose()


def count(valgrind: str, contender: str, requests: int) -> int:
    """Instructions a whole child run executes (callgrind's "Collected" total)."""
    with tempfile.TemporaryDirectory(prefix="ksbench-ir-") as workdir:
        command = [
            valgrind,
            "--tool=callgrind",
            f"--callgrind-out-file={workdir}/callgrind.out",
            sys.executable,
            __file__,
            "--child",
            contender,
            str(requests),
        ]
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Collected : (\d+)", done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"valgrind run failed ({contender}, {requests}):\n{done.stderr}")
    return int(found.group(1))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="N (default 1000)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        asyncio.run(serve(args.child[0], int(args.child[1])))
        return 0
    if args.requests < 1:
        parser.error("--requests must be positive")
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("valgrind is not installed (apt-get install valgrind)")
        return 1
    n = args.requests
    per_request = {}
    for short in CONTENDERS:
        per_request[short] = (count(valgrind, short, n) - count(valgrind, short, 0)) / n
    bare, off, on = per_request["bare"], per_request["off"], per_request["on"]
    plain = per_request["plain"]
    print(
        f"\nCPU instructions per request (valgrind callgrind, ({WARM_UP} + {n}) - ({WARM_UP} "
        f"+ 0) requests, raw ASGI in process); Python {sys.version.split()[0]}"
    )
    print(f"{'contender':<52}  {'instructions':>12}  {'x bare':>6}  {'added':>8}")
    print("-" * 84)
    for short, label in CONTENDERS.items():
        value = per_request[short]
        print(f"{label:<52}  {value:>12,.0f}  {value / bare:>6.3f}  {value - bare:>+8,.0f}")
    counted = off / plain
    verdict = "PASS" if counted <= 1.05 else "FAIL"
    print(
        f"\nmetrics (keystile.telemetry's counts): {off:,.0f} on vs {plain:,.0f} off "
        f"instructions per request = +{(counted - 1) * 100:.2f} % <= 5 %: {verdict}"
    )
    ratio = on / off
    verdict = "PASS" if ratio <= 1.10 else "FAIL"
    print(
        f"\nusage recording: {on:,.0f} on vs {off:,.0f} off instructions per request = "
        f"+{(ratio - 1) * 100:.2f} % <= 10 %: {verdict}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
