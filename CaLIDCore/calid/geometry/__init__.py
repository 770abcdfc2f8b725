"""Long-axis planes, reslicing, surfaces, and clinical volumes from label stacks."""
