// The console's entry point: hash routing between the three views, and the tokens dialog.

import { createAdaptersView } from "./adapters.js";
import { onCredentialsChange } from "./credentials.js";
import { setUpCredentialsDialog } from "./credentials_dialog.js";
import { createPlaygroundView } from "./playground.js";
import { createUploadView } from "./upload.js";

const DEFAULT_VIEW = "adapters";

function start() {
  setUpCredentialsDialog();
  const views = {};
  views.adapters = createAdaptersView({
    onOverwrite(name) {
      views.upload.prefill(name);
      location.hash = "#upload";
    },
  });
  views.upload = createUploadView({ onUploaded: () => views.adapters.refresh() });
  views.playground = createPlaygroundView();
  let current = null;

  function route({ moveFocus }) {
    const wanted = location.hash.slice(1);
    const name = wanted in views ? wanted : DEFAULT_VIEW;
    if (name === current) return;
    if (current) views[current].hide();
    current = name;
    for (const section of document.querySelectorAll("[data-view]")) section.hidden = section.dataset.view !== name;
    for (const link of document.querySelectorAll("[data-view-link]")) {
      if (link.dataset.viewLink === name) link.setAttribute("aria-current", "page");
      else link.removeAttribute("aria-current");
    }
    document.title = `${name[0].toUpperCase()}${name.slice(1)} · loraplex console`;
    views[name].show();
    if (moveFocus) document.getElementById("main").focus();
  }

  window.addEventListener("hashchange", () => route({ moveFocus: true }));
  onCredentialsChange(() => views[current].show());
  route({ moveFocus: false });
}

start();
