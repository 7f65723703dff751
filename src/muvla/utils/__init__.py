"""Small shared helpers: configs, sharded/atomic outputs, progress bars, device and threads."""
