"""The training core: what a model is (models), what it minimises (losses), how it learns and is
scored (engine, metrics). No files, no tracking, no printing: the commands do those."""
