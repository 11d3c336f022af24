"""Lightning callbacks: atomic last.ckpt, progress output."""
