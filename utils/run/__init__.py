"""The training run's parts, used by train_dreambooth.py: its flags and frozen configuration, data, loss,
checkpoints, class images, validation, tracking, stops and locks. Command-line tools live one level up (utils/)."""
