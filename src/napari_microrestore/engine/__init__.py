"""Engine: restore(), train() / finetune(), adapt_bn(): pure functions with progress and cancel."""
