"""`vistralv-ray chat`: talk to a trained model about an image, with the answer streamed as it is generated."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from PIL import Image

from vistralv_ray.data.images import open_checked, to_rgb
from vistralv_ray.inference.models import LoadedModel, generation_kwargs, model_inputs


def load_image(path: str | Path) -> Image.Image:
    """An image as training saw it: checked, EXIF orientation applied, transparency over white, RGB
    (training's own functions: a phone photo tagged "rotate 90" must not reach the model sideways)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--image: {path} does not exist")
    image = to_rgb(open_checked(path.read_bytes()))
    image.load()
    return image


class ChatSession:
    """A multi-turn conversation about at most one image, rendered with the model's own chat template."""

    def __init__(self, loaded: LoadedModel, image=None, system: str | None = None):
        self.loaded = loaded
        self.image = image
        self.messages: list[dict] = [{"role": "system", "content": system}] if system else []

    def ask(
        self, question: str, max_new_tokens: int = 256, temperature: float = 0.0, top_p: float = 0.9
    ) -> Iterator[str]:
        """Yields the answer in pieces as it is generated; the full answer joins the history."""
        from transformers import TextIteratorStreamer

        first_user = not any(m["role"] == "user" for m in self.messages)
        content = f"<image>\n{question}" if (first_user and self.image is not None) else question
        self.messages.append({"role": "user", "content": content})
        text = self.loaded.processor.apply_chat_template(self.messages, tokenize=False, add_generation_prompt=True)
        images = [self.image] if self.image is not None else []
        inputs = model_inputs(self.loaded, [text], images)
        streamer = TextIteratorStreamer(self.loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
        kwargs = {**inputs, **generation_kwargs(max_new_tokens, temperature, top_p), "streamer": streamer}
        worker = threading.Thread(target=self.loaded.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        pieces = []
        for piece in streamer:
            pieces.append(piece)
            yield piece
        worker.join()
        self.messages.append({"role": "assistant", "content": "".join(pieces).strip()})


def run_chat(
    session: ChatSession,
    prompt: str | None,
    write: Callable[[str], None],
    read: Callable[[str], str] = input,
    **gen,
) -> None:
    """One answer for `prompt`, or an interactive loop (empty line, `exit` or Ctrl-D ends it)."""
    questions = [prompt] if prompt is not None else None
    while True:
        if questions is not None:
            if not questions:
                return
            question = questions.pop(0)
        else:
            try:
                question = read("bạn> ").strip()
            except EOFError:
                return
            if not question or question in ("exit", "quit", "thoát"):
                return
        write("trợ lý> " if questions is None else "")
        for piece in session.ask(question, **gen):
            write(piece)
        write("\n")
