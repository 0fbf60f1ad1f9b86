"""`cpcoord run`: start a command as a member of a job, pass its exit status through.

The command is forked first and held at a gate (a pipe) until the coordinator has
attached it, so it is a member before it runs a single instruction of its own: a program
that registers regions through the local API (cpcoord.client) finds itself a member
already. With --range the ranges must exist in the new program, so it runs first and the
attach follows (retried while the ranges are not mapped yet). The child gets
CPCOORD_JOB and CPCOORD_MEMBER in its environment.

`run` waits with the signals it forwards blocked (sigtimedwait): SIGINT, SIGTERM, SIGHUP
and SIGQUIT sent to `run` go to the child; the same signal from the terminal (si_code
SI_KERNEL) already reached the child through its process group and is not sent twice.
When the child exits the member is detached (retried while a generation of the job is
in flight) and `run` exits with the child's status, a signal N as 128+N like a shell.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
from typing import Any

from cpcoord import clientconn
from cpcoord.cli.attach import add_range_argument, attach_request, range_regions
from cpcoord.errors import (
    CommandNotFound,
    CpcoordError,
    DuplicateMember,
    Forbidden,
    InvalidArgument,
    InvalidName,
    JobBusy,
    Unauthenticated,
    UnknownJob,
    UnknownMember,
)
from cpcoord.gen.v1 import coordinator_pb2
from cpcoord.ranges import check_name

NAME = "run"
HELP = "start a command as a member of a job"
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP
EPILOG = """\
examples:
  cpcoord run --job train-42 --member rank-0 -- python train.py --epochs 10
  cpcoord run --job sim --member w-3 --node gpu-1 --range 0x7f0000000000-0x7f0000400000 -- ./sim"""

FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
SI_KERNEL = 0x80  # si_code of a signal the kernel raised (a terminal's ^C), not kill(2)
ATTACH_RETRY_S = 5.0
DETACH_RETRY_S = 60.0
FATAL = (DuplicateMember, Forbidden, Unauthenticated, InvalidName, UnknownJob)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--job", required=True, help="job name")
    p.add_argument("--member", required=True, help="member name, unique in the job")
    p.add_argument("--node", default="", help="this node's agent (default: the only connected)")
    add_range_argument(p, "explicit region of the command's memory; repeatable (default: all)")
    p.add_argument("--tracker", default="", help="preferred tracker backend")
    clientconn.add_arguments(p)
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")


def _child(gate: int, argv: list[str], env: dict[str, str], mask: set[Any]) -> None:
    """In the forked child: wait for the gate, then become the command. Never returns."""
    try:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        go = os.read(gate, 1)
        os.close(gate)
        if go != b"g":
            os._exit(125)  # `run` gave up (attach refused): never run the command
        os.execvpe(argv[0], argv, env)
    except OSError as e:
        print(f"cpcoord run: {argv[0]}: {e.strerror}", file=sys.stderr, flush=True)
        os._exit(127 if isinstance(e, FileNotFoundError) else 126)
    finally:
        os._exit(125)


def _attach(c: Any, req: coordinator_pb2.AttachMemberRequest, retry: bool) -> None:
    deadline = time.monotonic() + (ATTACH_RETRY_S if retry else 0)
    while True:
        try:
            c.call("AttachMember", req)
            return
        except FATAL:
            raise
        except CpcoordError:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.1)


def _detach(c: Any, job: str, member: str) -> None:
    req = coordinator_pb2.DetachMemberRequest(job=job, member=member)
    deadline = time.monotonic() + DETACH_RETRY_S
    while True:
        try:
            c.call("DetachMember", req)
            return
        except (UnknownMember, UnknownJob):
            return  # the program left the job itself, or someone detached it
        except JobBusy:
            if time.monotonic() >= deadline:
                raise
            time.sleep(0.2)


def _wait(pid: int) -> int:
    """Forward signals until the child exits; its wait status."""
    watched = {*FORWARDED, signal.SIGCHLD}
    while True:
        info = signal.sigtimedwait(watched, 0.5)
        if info is not None and info.si_signo != signal.SIGCHLD and info.si_code != SI_KERNEL:
            with contextlib.suppress(ProcessLookupError):  # exited meanwhile
                os.kill(pid, info.si_signo)
        got, status = os.waitpid(pid, os.WNOHANG)
        if got == pid:
            return status


def exit_code(status: int) -> int:
    """A wait status as a shell reports it: the exit code, or 128+N for signal N."""
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def run(args: argparse.Namespace) -> int:
    check_name(args.job)
    check_name(args.member)
    argv = list(args.command)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise InvalidArgument("give the command to run after --")
    if shutil.which(argv[0]) is None:
        raise CommandNotFound(argv[0], "not found or not executable (PATH)")
    regions = range_regions(args.ranges)
    env = dict(os.environ, CPCOORD_JOB=args.job, CPCOORD_MEMBER=args.member)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {*FORWARDED, signal.SIGCHLD})
    r, w = os.pipe()
    # Forked before any gRPC channel exists: gRPC's threads do not survive a fork.
    pid = os.fork()
    if pid == 0:
        os.close(w)
        _child(r, argv, env, old)
    os.close(r)
    try:
        c = clientconn.connect(args)
    except BaseException:
        os.close(w)
        os.waitpid(pid, 0)
        raise
    with c:
        req = attach_request(args, regions, pid)
        try:
            if regions:  # the ranges are the command's: it must run first
                os.write(w, b"g")
                os.close(w)
            _attach(c, req, retry=bool(regions))
        except BaseException:
            if not regions:
                os.close(w)  # the gate closes: the command never runs
            else:
                os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise
        if not regions:
            os.write(w, b"g")
            os.close(w)
        status = _wait(pid)
        code = exit_code(status)
        try:
            _detach(c, args.job, args.member)
        except CpcoordError as e:
            print(f"cpcoord run: member not detached: {e.message()}", file=sys.stderr)
    return code
