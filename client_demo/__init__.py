"""Demo clients for Giftstream: a terminal viewer/host (`python -m client_demo.cli`)."""
