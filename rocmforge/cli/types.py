"""Option types the commands share, so a bad value is refused by click before anything loads (one line, exit 2).

>>> HOST.convert("::1", None, None), HOST.convert("my-box.local", None, None)
('::1', 'my-box.local')
>>> HOST.convert("no spaces", None, None)
Traceback (most recent call last):
...
click.exceptions.BadParameter: 'no spaces' is not an IP address or a host name.
"""
from __future__ import annotations

import ipaddress
import re
from typing import Any

import click

from rocmforge.backends.select import DEVICES

DEVICE = click.Choice(DEVICES, case_sensitive=False)
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")


class HostName(click.ParamType):
    """An interface to listen on: an IPv4/IPv6 address or a DNS host name (RFC 1123 labels)."""

    name = "host"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value)
        try:
            ipaddress.ip_address(text)
            return text
        except ValueError:
            pass
        if 0 < len(text) <= 253 and all(_LABEL.match(label) for label in text.rstrip(".").split(".")):
            return text
        self.fail(f"{text!r} is not an IP address or a host name.", param, ctx)


HOST = HostName()


def non_empty(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A callback refusing an empty string (an empty API key would be a key anyone can guess)."""
    if value is not None and not value.strip():
        raise click.BadParameter("must not be empty")
    return value
