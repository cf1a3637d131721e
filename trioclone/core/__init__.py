"""Sans-IO cores: no sockets, no clocks, no Trio. Time comes in as ``now``."""
