"""Applications: the ``lightning-maxup`` command, the digits demo and its study."""
