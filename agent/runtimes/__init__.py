"""Model runtimes behind one interface, loaded by name when a bundle needs one."""
