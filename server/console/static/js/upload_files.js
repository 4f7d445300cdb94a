// What the user picked or dropped, sorted into the server's upload parts: the two PEFT files, or one
// archive. Dropped folders are read through the File System entries API (one level of nesting).

export const CONFIG_FILE = "adapter_config.json";
export const WEIGHTS_FILE = "adapter_model.safetensors";
const ARCHIVE_PATTERN = /\.(zip|tar|tar\.gz|tgz)$/i;
const MAX_FOLDER_DEPTH = 2;

/** {config, weights, archive, ignored, folder}: `folder` names the dropped or chosen folder, if any. */
export function classify(files, folder = null) {
  const picked = { config: null, weights: null, archive: null, ignored: [], folder };
  for (const file of files) {
    const name = file.name;
    if (name === CONFIG_FILE) picked.config = file;
    else if (name === WEIGHTS_FILE) picked.weights = file;
    else if (ARCHIVE_PATTERN.test(name) && !picked.archive) picked.archive = file;
    else picked.ignored.push(file);
  }
  return picked;
}

/** Why this selection cannot be uploaded, or "" when it can. */
export function selectionProblem(picked) {
  const hasPair = picked.config || picked.weights;
  if (hasPair && picked.archive) return "Choose either the two adapter files or one archive, not both.";
  if (picked.archive) return "";
  if (picked.config && picked.weights) return "";
  if (picked.config) return `${WEIGHTS_FILE} is missing: add it next to ${CONFIG_FILE}.`;
  if (picked.weights) return `${CONFIG_FILE} is missing: add it next to ${WEIGHTS_FILE}.`;
  return `Add ${CONFIG_FILE} and ${WEIGHTS_FILE}, or one .zip, .tar or .tar.gz archive holding them.`;
}

/** A name the server accepts, derived from a folder or archive name ("" when nothing fits). */
export function suggestedName(picked) {
  let base = picked.folder || (picked.archive ? picked.archive.name.replace(ARCHIVE_PATTERN, "") : "");
  base = base.replace(/[^A-Za-z0-9._-]+/g, "-").replace(/^[.-]+/, "").slice(0, 64);
  return base;
}

/** Files and the top folder's name from a drop. Must be called during the drop event (items expire after). */
export function filesFromDrop(dataTransfer) {
  const entries = [...(dataTransfer.items || [])]
    .filter((item) => item.kind === "file")
    .map((item) => (item.webkitGetAsEntry ? item.webkitGetAsEntry() : null));
  if (!entries.length || entries.some((entry) => !entry)) {
    return Promise.resolve({ files: [...dataTransfer.files], folder: null });
  }
  return (async () => {
    const files = [];
    let folder = null;
    for (const entry of entries) {
      if (entry.isDirectory) {
        folder = folder || entry.name;
        files.push(...(await readFolder(entry, MAX_FOLDER_DEPTH)));
      } else {
        files.push(await entryFile(entry));
      }
    }
    return { files, folder };
  })();
}

/** Files of a folder chosen with <input webkitdirectory>, and the folder's name. */
export function filesFromFolderInput(fileList) {
  const files = [...fileList].filter((f) => f.webkitRelativePath.split("/").length <= MAX_FOLDER_DEPTH + 1);
  const folder = files.length ? files[0].webkitRelativePath.split("/")[0] : null;
  return { files, folder };
}

function entryFile(entry) {
  return new Promise((resolve, reject) => entry.file(resolve, reject));
}

async function readFolder(directory, depth) {
  const reader = directory.createReader();
  const entries = [];
  for (;;) {  // readEntries answers in batches until an empty one
    const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
    if (!batch.length) break;
    entries.push(...batch);
  }
  const files = [];
  for (const entry of entries) {
    if (entry.isFile) files.push(await entryFile(entry));
    else if (entry.isDirectory && depth > 1) files.push(...(await readFolder(entry, depth - 1)));
  }
  return files;
}
