"""Where batches run. One small protocol (``base.Provider``), one module per provider family."""
