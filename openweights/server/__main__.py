import argparse

from openweights.server.app import serve

parser = argparse.ArgumentParser(
    prog="python -m openweights.server", description="Run the openweights server."
)
parser.add_argument("--host", default="127.0.0.1")
parser.add_argument("--port", type=int, default=8124)
args = parser.parse_args()
serve(host=args.host, port=args.port)
