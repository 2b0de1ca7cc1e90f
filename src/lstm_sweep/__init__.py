"""lstm-sweep: designed experiments on the LSTM mean-prediction plateau."""

__version__ = "0.1.0"
