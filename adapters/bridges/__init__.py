"""Glue that is specific to one method on one host: each module adds a stage to a host (``registry.add_stage``).

`vtoken.registry` imports every module here after the hosts, so a new bridge is one new file."""
