"""`amesh`: the command line of affinity-mesh.

The group lives here; each family of commands sits in its own module of `dataplane.cli`
and is attached below, so this file stays the table of contents.
"""

from __future__ import annotations

import click

from dataplane.cli import demo as cli_demo, lab as cli_lab, map as cli_map, packets as cli_packets
from dataplane.cli import services as cli_services, top as cli_top


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="affinity-mesh")
def main() -> None:
    """affinity-mesh: a failure-tolerant service-chain dataplane."""


for command in (*cli_demo.COMMANDS, *cli_packets.COMMANDS, *cli_map.COMMANDS, *cli_lab.COMMANDS,
                *cli_services.COMMANDS, *cli_top.COMMANDS):
    main.add_command(command)
cli_map.map_group.add_command(cli_lab.map_show)
if __name__ == "__main__":
    main()
