"""Print how lusscore was built and whether a GPU is usable (build_info as JSON)."""
import json

import lusscore


def add_arguments(parser):
    pass


def main(args):
    print(json.dumps(lusscore.build_info(), indent=1))
