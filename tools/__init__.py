"""The operator's tools behind the `keysealer` command: dev, doctor, keys, status. They may load either side;
nothing in shared/, frontend/ or hsm_broker/ imports them."""
