"""One thin module per DVC stage: read config, call the core, write outputs."""
