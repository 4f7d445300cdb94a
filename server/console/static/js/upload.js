// The Upload view: drop or choose an adapter folder, its two files or an archive; send them as the
// server's multipart upload with XMLHttpRequest (for upload progress); show the server's verdict.

import { authHeaders, errorFromBody, explain, NETWORK_ERROR } from "./api.js";
import { askOnce } from "./credentials_dialog.js";
import { formatBytes } from "./format.js";
import {
  classify, CONFIG_FILE, filesFromDrop, filesFromFolderInput, selectionProblem, suggestedName, WEIGHTS_FILE,
} from "./upload_files.js";

const NAME_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;

export function createUploadView({ onUploaded }) {
  const el = (id) => document.getElementById(id);
  const form = el("upload-form"), nameInput = el("upload-name"), overwrite = el("upload-overwrite");
  const dropzone = el("dropzone"), fileInput = el("file-input"), folderInput = el("folder-input");
  let picked = classify([]);
  let autoName = "";  // the name last filled in from a folder or archive, replaced by the next one
  let uploading = false;

  el("choose-files").addEventListener("click", () => fileInput.click());
  el("choose-folder").addEventListener("click", () => folderInput.click());
  fileInput.addEventListener("change", () => choose({ files: [...fileInput.files], folder: null }));
  folderInput.addEventListener("change", () => choose(filesFromFolderInput(folderInput.files)));
  el("upload-clear").addEventListener("click", () => {
    choose({ files: [], folder: null });
    showResult("", "");
  });

  for (const type of ["dragenter", "dragover"]) {
    dropzone.addEventListener(type, (event) => {
      event.preventDefault();
      dropzone.classList.add("dragover");
    });
  }
  dropzone.addEventListener("dragleave", () => dropzone.classList.remove("dragover"));
  dropzone.addEventListener("drop", (event) => {
    event.preventDefault();
    dropzone.classList.remove("dragover");
    filesFromDrop(event.dataTransfer).then(choose, (error) => showResult("", `Could not read the drop: ${error}`));
  });

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!uploading) submit();
  });

  function choose({ files, folder }) {
    picked = classify(files, folder);
    const suggestion = suggestedName(picked);
    if (suggestion && (!nameInput.value || nameInput.value === autoName)) {
      nameInput.value = suggestion;
      autoName = suggestion;
    }
    fileInput.value = "";
    folderInput.value = "";
    listFiles();
    showResult("", "");
  }

  function listFiles() {
    const list = el("upload-files");
    list.replaceChildren();
    const used = [picked.config, picked.weights, picked.archive].filter(Boolean);
    for (const file of [...used, ...picked.ignored]) {
      const item = document.createElement("li");
      const ignored = !used.includes(file);
      if (ignored) item.className = "ignored";
      const name = document.createElement("span");
      name.textContent = ignored ? `${file.name} (not sent)` : file.name;
      const size = document.createElement("span");
      size.textContent = formatBytes(file.size);
      item.append(name, size);
      list.append(item);
    }
  }

  function problem() {
    const name = nameInput.value.trim();
    if (!NAME_PATTERN.test(name) || name.startsWith(".")) {
      return "Give the adapter a name: letters, digits, '.', '_' or '-', up to 64 characters, not starting with '.'.";
    }
    return selectionProblem(picked);
  }

  function submit() {
    const refusal = problem();
    if (refusal) {
      showResult("", refusal);
      return;
    }
    const name = nameInput.value.trim();
    const body = new FormData();
    body.append("name", name);
    if (overwrite.checked) body.append("overwrite", "true");
    if (picked.archive) {
      body.append("archive", picked.archive, picked.archive.name);
    } else {
      body.append(CONFIG_FILE, picked.config, CONFIG_FILE);
      body.append(WEIGHTS_FILE, picked.weights, WEIGHTS_FILE);
    }
    send(name, body);
  }

  function send(name, body) {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/adapters");
    for (const [header, value] of Object.entries(authHeaders("admin"))) xhr.setRequestHeader(header, value);
    setBusy(true);
    showResult("", "");
    progress(0, 0, "Starting…");
    xhr.upload.addEventListener("progress", (event) => {
      if (event.lengthComputable) progress(event.loaded, event.total);
    });
    xhr.upload.addEventListener("load", () => progress(1, 1, "Sent. The server is validating the adapter…"));
    xhr.addEventListener("load", () => {
      setBusy(false);
      if (xhr.status === 201) {
        const adapter = JSON.parse(xhr.responseText);
        progress(1, 1, "Done");
        showResult(`Uploaded ${adapter.id}: version ${adapter.version}, rank ${adapter.rank}, ` +
                   `${formatBytes(adapter.size_bytes)}. It is listed under Adapters and answers in the Playground.`, "");
        onUploaded(adapter);
        return;
      }
      el("upload-progress-row").hidden = true;
      const error = errorFromBody(xhr.status, xhr.responseText);
      let text = explain(error, "admin");
      if (error.code === "adapter_exists" || xhr.status === 409) {
        text += " Tick “Overwrite” to replace it with a new version.";
      }
      showResult("", text);
      if (xhr.status === 401) askOnce("The server needs its admin token to accept uploads.");
    });
    xhr.addEventListener("error", () => {
      setBusy(false);
      el("upload-progress-row").hidden = true;
      showResult("", `${NETWORK_ERROR} (An upload over the server's size limit can also be cut off this way.)`);
    });
    xhr.send(body);
  }

  function progress(loaded, total, label) {
    el("upload-progress-row").hidden = false;
    const bar = el("upload-progress");
    const percent = total ? Math.round((100 * loaded) / total) : 0;
    bar.value = percent;
    el("upload-progress-text").textContent =
      label || `${formatBytes(loaded)} of ${formatBytes(total)} (${percent}%)`;
  }

  function setBusy(busy) {
    uploading = busy;
    el("upload-submit").disabled = busy;
    form.setAttribute("aria-busy", String(busy));
  }

  function showResult(ok, error) {
    const result = el("upload-result"), box = el("upload-error");
    result.textContent = ok;
    result.className = ok ? "message ok" : "message";
    box.textContent = error;
    box.hidden = !error;
  }

  return {
    /** Open the form for a new version of `name`. */
    prefill(name) {
      nameInput.value = name;
      autoName = "";
      overwrite.checked = true;
    },
    show() {},
    hide() {},
  };
}
