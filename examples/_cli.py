"""Command-line plumbing shared by the examples (not an example itself)."""

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows the example's description and each option's default."""

    def _get_help_string(self, action):
        # Flags and options whose help says what happens without them need no "(default: None)".
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)
