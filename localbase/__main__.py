import argparse

from localbase import cli

parser = argparse.ArgumentParser(prog="python -m localbase", description=cli.__doc__)
cli.add_arguments(parser)
raise SystemExit(cli.run(parser.parse_args()))
