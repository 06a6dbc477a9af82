"""Demo clients for Giftstream: a room client library (`client.py`) and the terminal host,
viewer and tools built on it (`python -m client_demo`)."""
