"""``dicomnode bench``: the node measured side by side with dcmtk and with its own bare pipeline."""
