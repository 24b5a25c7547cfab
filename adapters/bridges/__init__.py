"""Glue that is specific to one method on one host: each module installs one method on one host
(``registry.add_bridge``).

`vtoken.registry` imports every module here after the hosts, so a new bridge is one new file."""
