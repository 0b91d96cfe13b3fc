"""The ``rocmforge`` command. Subcommands live in their own modules and are imported only when used,
so ``rocmforge models list`` does not pay for importing the server or the notebook widgets."""
from __future__ import annotations

import importlib
import logging
import sys

import click

from rocmforge.errors import RocmforgeError

# command name -> "module:attribute" of a click command or group
SUBCOMMANDS = {
    "models": "rocmforge.cli.models:models",
    "inspect": "rocmforge.cli.models:inspect",
    "context": "rocmforge.cli.context:context",
    "generate": "rocmforge.cli.generate:generate",
    "chat": "rocmforge.cli.generate:chat",
    "serve": "rocmforge.cli.serve:serve",
    "bench": "rocmforge.cli.bench:bench",
    "harvest": "rocmforge.cli.harvest:harvest",
    "batch": "rocmforge.cli.batch:batch",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(SUBCOMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in SUBCOMMANDS:
            return None
        module, attribute = SUBCOMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup)
@click.option("--debug", is_flag=True, help="Show tracebacks and debug logging.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Run GGUF models step by step on AMD/NVIDIA GPUs or numpy, and retrieve context for them."""
    ctx.obj = {"debug": debug}
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, format="rocmforge: %(message)s")


def main() -> None:
    """Entry point: user errors print one line and exit 1 (a bad option: 2); ``--debug`` shows the traceback."""
    try:
        cli.main(standalone_mode=False)
    except RocmforgeError as exc:
        if "--debug" in sys.argv:
            raise
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option value: one line (not click's usage block), exit code 2
        hint = f" (see 'rocmforge {exc.ctx.info_name} --help')" if exc.ctx is not None else ""
        click.echo(f"error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
