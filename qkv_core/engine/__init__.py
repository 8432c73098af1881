"""The engines over the model, codec and card layers: the sender (prefill, allocate, select, encode),
the receiver (intake, admission, store, generate), layer selection, codec-profile calibration and
cross-model alignment."""
