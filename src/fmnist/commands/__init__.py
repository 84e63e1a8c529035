"""One module per `fmnist` command. download, preprocess, train, evaluate and report are the DVC
stages (dvc.yaml runs them); predict and compare are for people. Each reads its settings, calls
the core, and writes its outputs."""
