"""The ``mmphi`` command line: one subcommand per stage of the platform."""
__version__ = "0.1.0"
