"""Where images come from: sources (MedMNIST .npz today) and the ingest that loads them."""
