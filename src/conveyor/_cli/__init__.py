"""Sub-commands of the ``conveyor`` command, one module each."""
