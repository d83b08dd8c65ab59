import sys
from pathlib import Path

# Tests import train.py, data/, models/ and spine/ from the repository root.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
