#!/usr/bin/env python3
"""Container entry point: ``supernet serve`` configured by environment variables that mirror its flags.

Every option of ``supernet serve`` can be set as ``SUPERNET_<OPTION>``: upper case, dashes to underscores, so
``--max-num-seqs 64`` is ``SUPERNET_MAX_NUM_SEQS=64`` and ``--allow-custom-placement`` is
``SUPERNET_ALLOW_CUSTOM_PLACEMENT=1`` (boolean flags take 1/true/yes/on or 0/false/no/off). Arguments given to the
container come after the ones built from the environment, so they win (the CLI keeps an option's last value).

Why the table is read from the CLI instead of written here: the image then mirrors exactly the flags of the
``supernet`` it ships, including flags added later (the vLLM backend's), and a ``SUPERNET_*`` variable that names
no flag stops the container at start-up with a message instead of being ignored (a typo in a Kubernetes manifest
would otherwise serve with defaults). Options that read a variable themselves (``--api-key`` reads
``SUPERNET_API_KEY``) are left to the CLI, which keeps secrets out of the process's argument list.

Run outside a container it is the same command: ``SUPERNET_PORT=8001 python deploy/entrypoint.py``.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Mapping

PREFIX = "SUPERNET_"
# Variables that are not flags of `serve`: the cache directories and the kernel switch the library reads,
# deploy/setup.sh's switches.
NOT_FLAGS = frozenset(
    {"SUPERNET_CACHE", "SUPERNET_CPU_KERNELS", "SUPERNET_KERNEL_CACHE", "SUPERNET_SKIP_APT", "SUPERNET_SKIP_VLLM"}
)
TRUE, FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off", ""}


class EntrypointError(Exception):
    """A setting the container cannot start with; the message names the variable."""


def serve_options() -> dict[str, object]:
    """``SUPERNET_<NAME>`` -> the click option of ``supernet serve`` it sets, read from the installed CLI."""
    import typer.main

    from supernet.cli import app

    command = typer.main.get_command(app).commands["serve"]
    return {PREFIX + p.name.upper(): p for p in command.params if p.param_type_name == "option"}


def serve_argv(environ: Mapping[str, str]) -> list[str]:
    """The ``supernet serve`` arguments the environment asks for (without the leading ``serve``)."""
    options = serve_options()
    argv: list[str] = []
    for name in sorted(k for k in environ if k.startswith(PREFIX)):
        value = environ[name]
        option = options.get(name)
        if option is None:
            if name in NOT_FLAGS:
                continue
            known = ", ".join(sorted(options))
            raise EntrypointError(f"{name}: `supernet serve` has no matching option; known variables: {known}")
        if option.envvar:  # the CLI reads this one itself (e.g. SUPERNET_API_KEY)
            continue
        flag = option.opts[0]
        if option.is_flag:
            if value.strip().lower() in TRUE:
                argv.append(flag)
            elif value.strip().lower() not in FALSE:
                raise EntrypointError(f"{name}={value!r}: expected 1/true/yes/on or 0/false/no/off")
        else:
            argv += [flag, value]
    return argv


def main(args: list[str] | None = None) -> None:
    from supernet.cli import app

    try:
        argv = ["serve", *serve_argv(os.environ), *(sys.argv[1:] if args is None else args)]
    except EntrypointError as err:
        print(f"error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    shown = ["***" if i and argv[i - 1] == "--api-key" else a for i, a in enumerate(argv)]
    print("supernet " + shlex.join(shown), file=sys.stderr, flush=True)
    app(args=argv, prog_name="supernet")


if __name__ == "__main__":
    main()
