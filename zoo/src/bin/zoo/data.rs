//! `zoo data fetch`: dataset downloads.

/// Downloads, verifies and unpacks a dataset.
pub fn fetch(
    dataset: &str,
    size: &str,
    dest: &std::path::Path,
    mirror: Option<&str>,
) -> Result<(), zoo::Error> {
    if dataset != "imagenette" {
        return Err(zoo::Error::Train(format!(
            "unknown dataset `{dataset}`: expected `imagenette`"
        )));
    }
    let size: zoo::data::fetch::ImagenetteSize = size.parse()?;
    let (bar, mut progress) = zoo::data::fetch::download_bar(size.folder());
    let root = zoo::data::fetch::fetch_imagenette(size, dest, mirror, &mut progress)?;
    bar.finish_and_clear();
    println!(
        "Imagenette is in {} (train with `--data {}`)",
        root.display(),
        root.display()
    );
    Ok(())
}
