"""Small shared helpers: configs, sharded/atomic outputs, progress bars."""
