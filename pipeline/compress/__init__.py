"""Model compression for export: a tf_keras copy, quantization-aware training and pruning (tfmot)."""
