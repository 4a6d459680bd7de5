"""The page of `fastpost serve` (gradio; rank 0 only). Its handlers hand requests to the Engine and wait; they never
touch the model or the process group themselves (the Engine's loop on the main thread does, one request at a time).
"""

from __future__ import annotations

import random
from pathlib import Path

import gradio as gr

from fastpost.serve.engine import Engine, Request
from fastpost.serve.paths import list_images, list_loras

NO_LORA = ("(none)", "")
# the controls in Request's field order: the API's positional arguments are these
FIELDS = ["prompt", "negative_prompt", "steps", "guidance_scale", "seed", "height", "width", "num_frames", "sampler",
          "lora", "lora_scale", "image"]


def status_line(engine: Engine) -> str:
    if engine.dead:
        return f"**Stopped:** {engine.dead}"
    c = engine.cfg.parallel
    state = "sampling" if engine.busy else "ready"
    return (f"**{state}** · {engine.family.name} on {engine.world} rank(s) (ulysses {c.ulysses} x cfg {c.cfg}, "
            f"{engine.device.type}) · one request at a time; queued requests show their position")


def _caption(r: dict) -> str:
    q = r["request"]
    lora = f" · LoRA {q['lora']} x{q['lora_scale']:g}" if q["lora"] else ""
    return f"{q['prompt'][:60]} · seed {q['seed']} · {q['steps']} steps · cfg {q['guidance_scale']:g}{lora}"


def _gallery(engine: Engine) -> list[tuple[str, str]]:
    return [(r["video"], _caption(r)) for r in engine.history]


def build_app(engine: Engine) -> gr.Blocks:
    d, lim = engine.defaults(), engine.limits()
    m, k = lim["multiple"], lim["temporal"]

    def lora_choices():
        return [NO_LORA] + [(n, n) for n in list_loras(engine.lora_dir)]

    with gr.Blocks(title="fastpost serve") as demo:
        gr.Markdown("# fastpost serve")
        status = gr.Markdown(status_line(engine), elem_id="status")
        with gr.Row():
            with gr.Column():
                prompt = gr.Textbox(label="Prompt", value=d.prompt, lines=3, elem_id="prompt")
                negative = gr.Textbox(label="Negative prompt", value=d.negative_prompt)
                with gr.Row():
                    steps = gr.Slider(1, max(200, d.steps), value=d.steps, step=1, label="Steps")
                    guidance = gr.Slider(0, 20, value=d.guidance_scale, step=0.1, label="Guidance scale",
                                         info="<= 1 turns classifier-free guidance off"
                                              + (" (not with parallel.cfg=2)" if engine.cfg.parallel.cfg == 2 else ""))
                with gr.Row():
                    seed = gr.Number(value=d.seed, precision=0, minimum=0, label="Seed")
                    dice = gr.Button("Random seed", scale=0)
                with gr.Row():
                    height = gr.Slider(m, max(2 * d.height, 4 * m), value=d.height, step=m, label="Height",
                                       info=lim["size_reason"])
                    width = gr.Slider(m, max(2 * d.width, 4 * m), value=d.width, step=m, label="Width",
                                      info=lim["size_reason"])
                frames = gr.Slider(1, 1 + k * max(4, 2 * ((d.num_frames - 1) // k)), value=d.num_frames, step=k,
                                   label="Frames", info=lim["frames_reason"])
                sampler = gr.Dropdown(engine.samplers(), value=d.sampler, label="Sampler",
                                      info="the job's sampler_args apply to the job's own sampler only")
                with gr.Row():
                    lora = gr.Dropdown(lora_choices(), value="", label="LoRA", allow_custom_value=True,
                                       info=f"folders under {engine.lora_dir}" if engine.lora_dir
                                       else "start with --lora-dir DIR to pick LoRAs")
                    lora_scale = gr.Slider(0, 2, value=d.lora_scale, step=0.05, label="LoRA scale")
                    rescan = gr.Button("Rescan", scale=0)
                # families conditioned on an image (I2V) get the control; the others never see it
                image = gr.Dropdown([("(none)", "")] + [(n, n) for n in list_images(engine.image_dir)], value="",
                                    label="Image (first frame)", allow_custom_value=True,
                                    visible=engine.takes_image(), info=f"files under {engine.image_dir}")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column():
                video = gr.Video(label="Result", autoplay=True, loop=True, elem_id="result")
                files = gr.File(label="Download: video + metadata json", file_count="multiple")
                info = gr.Markdown()
        gallery = gr.Gallery(_gallery(engine), label="Outputs since the server started (click one to restore "
                             "its settings)", columns=4, elem_id="gallery")
        controls = [prompt, negative, steps, guidance, seed, height, width, frames, sampler, lora, lora_scale, image]

        def generate(*values, progress=gr.Progress()):
            job = engine.submit(Request(**dict(zip(FIELDS, values))))
            progress(0, desc="waiting for the sampler")
            seen = 0
            while True:
                event = job.events.get()
                if event[0] == "step":
                    seen += 1
                    progress((event[1], event[2]), desc="denoising", unit="steps")
                elif event[0] == "error":
                    raise gr.Error(event[1], duration=None)
                else:
                    r = event[1]
                    t = r["meta"]["elapsed_s"]
                    note = (f"{Path(r['video']).name}: {seen}/{r['meta']['steps']} steps reported; {t['total']:.1f}s "
                            f"(denoise {t['denoise']:.1f}s, decode {t['decode']:.1f}s)")
                    return r["video"], [r["video"], r["metadata"]], note, _gallery(engine), status_line(engine)

        run.click(generate, controls, [video, files, info, gallery, status], api_name="generate",
                  concurrency_limit=1, concurrency_id="sampler")

        def restore(evt: gr.SelectData):
            r = engine.history[evt.index]
            q = r["request"]
            return [q[f] if q[f] is not None else "" for f in FIELDS] + [r["video"], [r["video"], r["metadata"]]]

        gallery.select(restore, None, controls + [video, files], api_name="restore")
        dice.click(lambda: random.randrange(2 ** 31), None, seed, api_name=False)
        rescan.click(lambda: gr.update(choices=lora_choices()), None, lora, api_name=False)
        timer = gr.Timer(2.0)
        timer.tick(lambda: status_line(engine), None, status, api_name=False, show_progress="hidden")
        demo.load(lambda: (_gallery(engine), status_line(engine)), None, [gallery, status], api_name=False)
    return demo

