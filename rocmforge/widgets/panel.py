"""``GenerationPanel``: generate from a notebook with sliders, watch the text stream, and look at each token.

Generation runs in a background thread, so the kernel stays responsive and Stop (checked before every token is
drawn) ends it within one token. Everything the buttons do is also a method, so code can drive the panel:

>>> import rocmforge
>>> from rocmforge.widgets import GenerationPanel
>>> panel = GenerationPanel(rocmforge.load("smollm2-135m"))  # doctest: +SKIP
>>> panel.prompt.value = "The capital of France is"  # doctest: +SKIP
>>> panel.temperature.value, panel.max_new_tokens.value = 0.0, 4  # doctest: +SKIP
>>> panel.generate(wait=True).text  # doctest: +SKIP
' Paris. It is'
"""
from __future__ import annotations

import html
import threading
from collections.abc import Callable
from typing import Any

import ipywidgets as w

from rocmforge.sampler import SamplingParams
from rocmforge.widgets import render
from rocmforge.widgets.inside import InsideView, look_inside, supports_hooks
from rocmforge.widgets.prompting import cited_passages, prompt_ids, prompt_text
from rocmforge.widgets.record import GenerationResult, TokenStep, record_generation

_WIDE = w.Layout(width="98%")
_SLIDER_STYLE = {"description_width": "130px"}


class GenerationPanel:
    """Prompt box, mode toggle, sampling controls, Generate/Stop, streamed output, token view, inside view.

    ``store`` (a ``context_store.ContextStore``, optional) adds a "use context" toggle and ``k``: the prompt is
    searched, the passages go into the prompt, and they are listed beside the answer (cited ones marked).
    While it generates, leave the model to the panel: its KV cache and hooks are not made for two threads.
    """

    def __init__(self, model: Any, store: Any | None = None) -> None:
        self.model, self.store = model, store
        self.result: GenerationResult | None = None
        self.inside: InsideView | None = None
        self.error: BaseException | None = None
        self.progress: list[TokenStep] = []  # tokens of the generation in progress, as they are drawn
        self._worker: threading.Thread | None = None
        self._stop_requested = threading.Event()
        defaults = SamplingParams()

        self.prompt = w.Textarea(placeholder="Type a prompt…", layout=w.Layout(width="98%", height="80px"))
        self.mode = w.ToggleButtons(options=["completion", "chat"], value="completion", description="mode")
        self.temperature = _slider(w.FloatSlider, "temperature", defaults.temperature, 0.0, 2.0, 0.05)
        self.top_k = _slider(w.IntSlider, "top-k (0: off)", defaults.top_k, 0, 200, 1)
        self.top_p = _slider(w.FloatSlider, "top-p", defaults.top_p, 0.05, 1.0, 0.01)
        self.min_p = _slider(w.FloatSlider, "min-p", defaults.min_p, 0.0, 1.0, 0.01)
        self.repeat_penalty = _slider(w.FloatSlider, "repetition penalty", defaults.repeat_penalty, 0.5, 2.0, 0.05)
        self.max_new_tokens = _slider(w.IntSlider, "max new tokens", 64, 1, 1024, 1)
        self.seed = w.IntText(value=0, description="seed (-1: random)", style=_SLIDER_STYLE)
        self.use_context = w.Checkbox(value=store is not None, description="use context", disabled=store is None)
        self.k = _slider(w.IntSlider, "passages k", 3, 1, 10, 1)
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.status = w.HTML("<i>ready</i>")

        self.output = w.Output(layout=w.Layout(width="60%" if store is not None else "98%", min_height="60px",
                                              border="1px solid #ddd", padding="4px"))
        self.passages = w.HTML("", layout=w.Layout(width="38%"))
        self.stats = w.HTML("")
        self.tokens = w.HTML("")
        self.token_index = w.IntSlider(value=0, min=0, max=0, description="token", disabled=True)
        self.token_alternatives = w.HTML("")
        self.inside_button = w.Button(description="Look inside the last generation", icon="search",
                                      layout=w.Layout(width="auto"), disabled=not supports_hooks(model))
        self.layer = w.IntSlider(value=0, min=0, max=model.cfg.n_layers - 1, description="layer")
        self.head = w.IntSlider(value=0, min=0, max=model.cfg.n_heads - 1, description="head")
        self.attention = w.HTML("" if supports_hooks(model) else "<i>this model has no hooks (run_with_cache)</i>")
        self.logit_lens = w.HTML("")

        self.generate_button.on_click(lambda _: self._guarded(self.generate))
        self.stop_button.on_click(lambda _: self.stop())
        self.token_index.observe(lambda _: self._show_alternatives(), names="value")
        self.inside_button.on_click(lambda _: self._guarded(lambda: self.look_inside(wait=False)))
        self.layer.observe(lambda _: self._show_attention(), names="value")
        self.head.observe(lambda _: self._show_attention(), names="value")
        self.widget = self._layout()

    def _layout(self) -> w.Widget:
        sampling = w.GridBox([self.temperature, self.top_k, self.top_p, self.min_p, self.repeat_penalty,
                              self.max_new_tokens, self.seed],
                             layout=w.Layout(grid_template_columns="repeat(2, 50%)"))
        context = [w.HBox([self.use_context, self.k])] if self.store is not None else []
        answer = w.HBox([self.output, self.passages]) if self.store is not None else self.output
        tabs = w.Tab([w.VBox([answer, self.stats]),
                      w.VBox([self.tokens, self.token_index, self.token_alternatives]),
                      w.VBox([self.inside_button, w.HBox([self.layer, self.head]),
                              w.HBox([self.logit_lens, self.attention])])])
        for i, title in enumerate(["Output", "Tokens", "Inside the model"]):
            tabs.set_title(i, title)
        title = w.HTML(f"<b>rocmforge</b> · {html.escape(getattr(self.model, 'name', 'model'))}")
        return w.VBox([title, self.prompt, self.mode, sampling, *context,
                       w.HBox([self.generate_button, self.stop_button, self.status]), tabs], layout=_WIDE)

    def __repr__(self) -> str:
        return f"GenerationPanel({getattr(self.model, 'name', 'model')!r}, store={self.store is not None})"

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        # The widget view, with a short text form (the box's own repr lists every child widget).
        bundle = self.widget._repr_mimebundle_(**kwargs)
        return {**bundle, "text/plain": repr(self)} if isinstance(bundle, dict) else bundle

    # --- driving it ------------------------------------------------------------------------------------------
    def sampling_params(self) -> SamplingParams:
        """The sampler settings the controls show now."""
        return SamplingParams(temperature=self.temperature.value, top_k=self.top_k.value, top_p=self.top_p.value,
                              min_p=self.min_p.value, repeat_penalty=self.repeat_penalty.value,
                              seed=None if self.seed.value < 0 else self.seed.value)

    @property
    def running(self) -> bool:
        return self._worker is not None and self._worker.is_alive()

    def generate(self, wait: bool = False) -> GenerationResult | None:
        """Start generating from the current prompt and settings; with ``wait`` block and return the result."""
        self._ensure_idle()
        settings = {"prompt": self.prompt.value, "chat": self.mode.value == "chat",
                    "params": self.sampling_params(), "max_new_tokens": self.max_new_tokens.value,
                    "k": self.k.value if self.store is not None and self.use_context.value else 0}
        self._stop_requested.clear()
        self.progress, self.output.outputs = [], ()  # before the thread starts, so callers never see the last run's
        self._start(lambda: self._generate(**settings), busy="generating…")
        if wait:
            return self.wait()
        return None

    def stop(self) -> None:
        """Ask the running generation to end before its next token."""
        self._stop_requested.set()

    def wait(self, timeout: float | None = None) -> GenerationResult | None:
        """Block until the background work finishes; re-raise its error if it failed."""
        if self._worker is not None:
            self._worker.join(timeout)
            if self._worker.is_alive():
                raise TimeoutError(f"the panel is still running after {timeout} s")
        if self.error is not None:
            raise self.error
        return self.result

    def look_inside(self, wait: bool = True) -> InsideView | None:
        """Cache attention patterns and the logit lens of the last generation (prompt + generated tokens)."""
        self._ensure_idle()
        if self.result is None:
            raise RuntimeError("nothing generated yet: generate first")
        if not supports_hooks(self.model):
            raise RuntimeError("this model has no run_with_cache, so the inside view is unavailable")
        token_ids = self.result.prompt_ids + self.result.token_ids
        self._start(lambda: self._look_inside(token_ids), busy="running the sequence with hooks…")
        if wait:
            self.wait()
            return self.inside
        return None

    # --- background work -------------------------------------------------------------------------------------
    def _ensure_idle(self) -> None:
        if self.running:
            raise RuntimeError("the panel is already running (generating or looking inside): stop it or wait")

    def _start(self, work: Callable[[], None], busy: str) -> None:
        self.error = None
        self._set_busy(True, busy)

        def run() -> None:
            try:
                work()
            except BaseException as exc:  # shown in the panel; `wait` re-raises it for code
                self.error = exc
                self.status.value = f"<b style='color:#b00'>error:</b> {html.escape(str(exc) or type(exc).__name__)}"
            finally:
                self._set_busy(False)

        self._worker = threading.Thread(target=run, name="rocmforge-panel", daemon=True)
        self._worker.start()

    def _guarded(self, action: Callable[[], Any]) -> None:
        try:  # a button click has no caller to raise to: say what went wrong in the status line
            action()
        except RuntimeError as exc:
            self.status.value = f"<b style='color:#b00'>{html.escape(str(exc))}</b>"

    def _set_busy(self, busy: bool, message: str = "") -> None:
        self.generate_button.disabled = busy
        self.inside_button.disabled = busy or not supports_hooks(self.model)
        self.stop_button.disabled = not busy
        if message:
            self.status.value = f"<i>{html.escape(message)}</i>"

    def _generate(self, prompt: str, chat: bool, params: SamplingParams, max_new_tokens: int, k: int) -> None:
        passages = self.store.search(prompt, k=k) if k else []
        self.passages.value = render.passages_html(passages, []) if self.store is not None else ""
        text = prompt_text(self.model, prompt, chat, passages)
        streamed: list[str] = []

        def show(piece: str) -> None:
            streamed.append(piece)
            self.output.outputs = ({"output_type": "stream", "name": "stdout", "text": "".join(streamed)},)

        def count(step: TokenStep) -> None:
            self.progress.append(step)
            self.status.value = f"<i>generating… {len(self.progress)} tokens</i>"

        result = record_generation(self.model, prompt_ids(self.model, text), params, max_new_tokens,
                                   prompt=text, on_text=show, on_token=count, stop_requested=self._stop_requested)
        result.passages, result.cited = passages, cited_passages(result.text, len(passages))
        result.settings = {"mode": "chat" if chat else "completion", "max_new_tokens": max_new_tokens, "k": k,
                           **{name: getattr(params, name) for name in
                              ("temperature", "top_k", "top_p", "min_p", "repeat_penalty", "seed")}}
        self.result, self.inside = result, None
        self._show_result(result)

    def _show_result(self, result: GenerationResult) -> None:
        self.stats.value = render.stats_html(result)
        self.tokens.value = render.token_html(result.tokens)
        if self.store is not None:
            self.passages.value = render.passages_html(result.passages, result.cited)
        self.token_index.max = max(len(result.tokens) - 1, 0)
        self.token_index.disabled = not result.tokens
        self._show_alternatives()
        self.attention.value = self.logit_lens.value = ""
        self.status.value = "<i>stopped</i>" if result.finish_reason == "cancelled" else "<i>done</i>"

    def _show_alternatives(self) -> None:
        tokens = self.result.tokens if self.result is not None else []
        i = self.token_index.value
        self.token_alternatives.value = render.alternatives_html(tokens[i], i) if i < len(tokens) else ""

    def _look_inside(self, token_ids: list[int]) -> None:
        self.inside = look_inside(self.model, token_ids)
        self.logit_lens.value = render.logit_lens_html(self.inside.lens)
        self._show_attention()
        self.status.value = "<i>done</i>"

    def _show_attention(self) -> None:
        if self.inside is None:
            return
        layer, head = self.layer.value, self.head.value
        self.attention.value = render.attention_html(self.inside.pattern(layer, head), self.inside.labels,
                                                     f"layer {layer}, head {head}")


def _slider(kind: type, description: str, value: float, low: float, high: float, step: float) -> w.Widget:
    return kind(value=value, min=low, max=high, step=step, description=description, style=_SLIDER_STYLE,
                continuous_update=False)
