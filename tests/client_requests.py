"""Requests that Open WebUI and SillyTavern send to an image backend, replayed byte for byte.

Each one names the file it mirrors (read from the project's sources at the commit given, never
copied). Values the user sets in those clients' settings (size, steps, sampler, the backend's
address and credentials) are filled in for the bundled 64×64 shapes model; the structure, key order,
defaults and encoding are the client's own.
"""

from __future__ import annotations

import base64
import json

# -- SillyTavern ------------------------------------------------------------------------------------------
# SillyTavern/SillyTavern@ba6f7b7a98cf7a5eaf4f0e81da9779a9a668ced4
# public/scripts/extensions/stable-diffusion/index.js, generateAutoImage(): the browser builds this body
# (getSdRequestBody()'s {url, auth} first; `seed` is left undefined, so absent, while the setting is -1;
# `sd_vae` likewise while no VAE is chosen) and src/endpoints/stable-diffusion.js, router.post('/generate'),
# forwards it unchanged with JSON.stringify(request.body) to /sdapi/v1/txt2img, with
# 'Authorization': getBasicAuthHeader(request.body.auth) (src/util.js: `Basic ${base64(auth)}`).
# It reads data.images[0].
SILLYTAVERN_TXT2IMG = (
    '{{"url":"{url}","auth":"{auth}","prompt":"{prompt}","negative_prompt":"","sampler_name":"DDIM",'
    '"scheduler":"normal","steps":8,"cfg_scale":7,"width":64,"height":64,"restore_faces":false,"enable_hr":false,'
    '"hr_upscaler":"Latent","hr_scale":2,"denoising_strength":0.7,"hr_second_pass_steps":0,'
    '"override_settings":{{"CLIP_stop_at_last_layers":1}},"override_settings_restore_afterwards":true,'
    '"clip_skip":1,"save_images":true,"send_images":true,"do_not_save_grid":false,"do_not_save_samples":false}}'
)
# src/endpoints/stable-diffusion.js, router.post('/set-model'): POST /sdapi/v1/options with this body, then
# GET /sdapi/v1/progress until progress == 0 and state.job_count == 0.
SILLYTAVERN_SET_MODEL = '{{"sd_model_checkpoint":"{model}"}}'
# GETs of the same file, and the fields it reads from each answer.
SILLYTAVERN_READS = {
    "/sdapi/v1/options": "sd_model_checkpoint",  # /ping, /get-model
    "/sdapi/v1/sd-models": "title",  # /models: data.map(x => ({value: x.title, text: x.title}))
    "/sdapi/v1/samplers": "name",
    "/sdapi/v1/schedulers": "name",
    "/sdapi/v1/upscalers": "name",
    "/sdapi/v1/latent-upscale-modes": "name",
    "/sdapi/v1/sd-vae": "model_name",
}


def sillytavern_txt2img(url: str, auth: str, prompt: str) -> tuple[bytes, dict[str, str]]:
    body = SILLYTAVERN_TXT2IMG.format(url=url, auth=auth, prompt=prompt).encode()
    return body, {"Content-Type": "application/json", "Authorization": basic_header(auth)}


def basic_header(auth: str) -> str:
    """Both clients' `Basic ${base64(auth)}` of their "user:password" setting."""
    return "Basic " + base64.b64encode(auth.encode()).decode()


# -- Open WebUI ------------------------------------------------------------------------------------------
# open-webui/open-webui@02530d501461ce58ab06231d7c2ef2024a141ddf backend/open_webui/routers/images.py,
# image_generations() for the automatic1111 engine: aiohttp's json= (json.dumps: ", " and ": "
# separators) of {prompt, batch_size, width, height, steps?, negative_prompt?} to /sdapi/v1/txt2img with
# {'authorization': get_automatic1111_api_auth(...)} (Basic base64 of AUTOMATIC1111_API_AUTH). It reads
# res['images'] (each base64) and res['info'].


def open_webui_txt2img(auth: str, prompt: str, n: int, size: str, steps: int) -> tuple[bytes, dict[str, str]]:
    width, height = tuple(map(int, size.split("x")))
    data = {"prompt": prompt, "batch_size": n, "width": width, "height": height, "steps": steps}
    return json.dumps(data).encode(), {"Content-Type": "application/json", "authorization": basic_header(auth)}


# Same file, set_image_model(): GET /sdapi/v1/options, then, if options['sd_model_checkpoint'] differs,
# POST the whole options dict back with it changed. get_models(): GET /sdapi/v1/sd-models, reading
# model['title'] and model['model_name'].
#
# Same file, image_edits() for the openai engine: multipart (aiohttp FormData) with the text fields
# model, prompt, n (str), size and response_format='b64_json', then each image as a file part named
# 'image[]' when the chat gave a list (one, here), 'image' otherwise; 'Authorization: Bearer <key>'.
# It reads res['data'][i]['url'] or ['b64_json'].


def open_webui_edit_fields(model: str, prompt: str, n: int, size: str) -> dict[str, str]:
    return {"model": model, "prompt": prompt, "n": str(n), "size": size, "response_format": "b64_json"}
