"""The ``anystep`` subcommands, one module per family. :mod:`anystep.cli` imports a command's module
only when that command runs, so each imports torch and diffusers at its top while ``anystep --help``
stays fast."""
