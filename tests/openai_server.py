"""A small, real OpenAI-compatible chat completions server, for testing 05_eval.py --judge-api.

Serves one local model (default: the embedded one) over HTTP with the standard library:
POST /v1/chat/completions (non-streaming, greedy), GET /v1/models, GET /health.
It prints `listening on PORT` once ready, so a test can start it on port 0 and read the port.

    python tests/openai_server.py --model smollm2-135m --port 8000 --api-key secret
"""
import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402


def make_handler(model, tokenizer, model_name, api_key):
    class Handler(BaseHTTPRequestHandler):
        def reply(self, status, body):
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            if self.path == "/health":
                return self.reply(200, {"status": "ok"})
            if self.path == "/v1/models":
                return self.reply(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            self.reply(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if self.path != "/v1/chat/completions":
                return self.reply(404, {"error": {"message": f"no route {self.path}"}})
            if api_key and self.headers.get("Authorization") != f"Bearer {api_key}":
                return self.reply(401, {"error": {"message": "invalid API key"}})
            try:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                messages = request["messages"]
            except (ValueError, KeyError) as error:
                return self.reply(400, {"error": {"message": f"bad request: {error}"}})
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            prompt_ids = tokenizer(text, add_special_tokens=False).input_ids
            max_tokens = int(request.get("max_tokens") or 64)
            (_, samples), = next(common.generate_batches(model, tokenizer, [prompt_ids], max_new_tokens=max_tokens,
                                                          show_progress=False))
            sample = samples[0]
            self.reply(200, {
                "id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "created": int(time.time()),
                "model": request.get("model", model_name),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": sample["text"]},
                             "finish_reason": "length" if sample["truncated"] else "stop"}],
                "usage": {"prompt_tokens": len(prompt_ids), "completion_tokens": sample["new_tokens"],
                          "total_tokens": len(prompt_ids) + sample["new_tokens"]}})

        def log_message(self, format, *args):  # keep the test output quiet
            pass

    return Handler


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=common.EMBEDDED_MODEL, help="model to serve")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    parser.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    parser.add_argument("--api-key", default=None, help="require this bearer key")
    args = parser.parse_args()
    model, tokenizer = common.load_model(args.model)
    server = HTTPServer((args.host, args.port), make_handler(model, tokenizer, args.model, args.api_key))
    print(f"listening on {server.server_address[1]}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    server.server_close()


if __name__ == "__main__":
    common.run_main(main)
